"""The command line starts fast: building the parser (every `--help`, every argument error) imports no torch."""

import subprocess
import sys


def test_help_does_not_import_torch():
    code = ("import sys\nfrom diffalign.cli import main\n"
            "for argv in (['--help'], ['toy', '--help'], ['toy', 'pretrain', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: diffalign toy pretrain" in out
    assert out.strip().splitlines()[-1] == "False"
