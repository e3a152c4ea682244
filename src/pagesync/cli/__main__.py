from pagesync.cli import main

main()
