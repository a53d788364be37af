from rlcd.cli import main

main()
