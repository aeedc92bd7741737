"""Checks against hostile or merely odd input, shared by several commands (issue 22): seeds, text files, paths
that must stay inside a folder, YAML without aliases, image decoding limits, and a full disk."""
