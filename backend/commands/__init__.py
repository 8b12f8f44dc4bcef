"""One module per `subdisc` sub-command; each exposes `register(subparsers)`."""
