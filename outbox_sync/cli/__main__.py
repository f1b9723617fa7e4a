from outbox_sync.cli import main

main()
