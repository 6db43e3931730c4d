"""Recipes: the YAML a user writes, validated into frozen, typed models.

Field names are the YAML keys. Each field's description is its documentation: `ftune
schema` prints it and error messages quote it. This package imports no torch and nothing
else of ftune's but `errors` and `safe_yaml`, so `ftune validate` stays fast.

- sections.py: every section but data and the RL ones, each field documented once
- data.py: the data section (sources, formats, chat template, mixtures, dedup, filters)
- rl.py: rewards and grpo sections
- model.py: the whole Recipe and the rules that join its sections
- loading.py: file, safe YAML, --set overrides, errors placed at their line
- schema.py: resolved YAML for run directories, JSON Schema, `ftune schema`
"""

# ruff: noqa: F401
from ftune.recipe.sections import (
    MAX_RECIPE_BYTES,
    INT64_MAX,
    MAX_TOKENS,
    MAX_COUNT,
    Section,
    CrossFieldError,
    PathText,
    BaseModelSection,
    AdapterMethod,
    LORA_METHODS,
    VIRTUAL_TOKEN_METHODS,
    ADAPTER_FIELDS,
    VERA_DEFAULT_R,
    AdapterSection,
    QuantizationSection,
    TrainingSection,
    PreferenceSection,
    RMSection,
    EvaluationSection,
    DistributedSection,
    OutputSection,
)
from ftune.recipe.data import (
    DataFormat,
    FORMAT_COLUMNS,
    CHAT_TEMPLATE_NAMES,
    DataSource,
    DedupSection,
    FiltersSection,
    DataSection,
)
from ftune.recipe.rl import (
    REWARD_TYPES,
    REWARD_FIELDS,
    RewardSection,
    GrpoSection,
)
from ftune.recipe.model import (
    Recipe,
)
from ftune.recipe.loading import (
    load_recipe,
    read_recipe_text,
    parse_recipe,
    output_dir_problem,
    _inner_model,
    _model_at,
)
from ftune.recipe.schema import (
    recipe_to_yaml,
    schema_json,
    schema_fields,
)
