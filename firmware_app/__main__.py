from firmware_app.cli import main

raise SystemExit(main())
