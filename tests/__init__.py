"""The execproto test suite."""
