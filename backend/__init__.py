"""subdisc's backend: clustering, scoring, reports, the Label Studio ML backend, and the CLI."""
