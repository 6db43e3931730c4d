from ftune.cli import main

main()
