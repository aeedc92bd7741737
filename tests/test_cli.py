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


def test_output_into_a_closed_pipe_ends_quietly():
    """`diffalign configs | head -1`: the reader goes away after one line; the command stops with SIGPIPE's usual
    status and no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "diffalign", "configs"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    first = proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and first
    assert "Traceback" not in err and "BrokenPipeError" not in err
