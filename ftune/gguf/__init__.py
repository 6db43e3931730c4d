"""GGUF export: convert a Hugging Face model for llama.cpp, Ollama and LM Studio, and prove it.

`export.py` is the stage (`ftune export-gguf`) and reads top to bottom. The steps it calls:

- `formats.py`  the output types: what each costs and how it is made (no heavy imports)
- `arch.py`     per-architecture facts: metadata keys, tensor names, weight layout changes
- `vocab.py`    the tokenizer as llama.cpp reads it, pre-tokenizer choice included
- `templates.py` chat template styles: recognised, proven against the jinja, written in Go
- `convert.py`  streams safetensors into a GGUF file one tensor at a time
- `quantize.py` K-quants through llama.cpp's own quantizer (llama-cpp-python)
- `verify.py`   parity of the written file (llama.cpp) with the source (transformers)
- `ollama.py`   the Modelfile: FROM, TEMPLATE, SYSTEM and stop tokens
"""
