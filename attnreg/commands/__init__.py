"""The sub-commands of `attnreg`, one module each with `register(subparsers)` and its `cmd_*`; `common`
holds what they share. The library below never imports from here."""
