from netstack.daemon.main import main

raise SystemExit(main())
