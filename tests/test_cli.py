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
    """`diffalign configs | head -1`: the reader has gone; the command stops with SIGPIPE's usual status and no
    traceback. The pipe's reading end is closed before the command starts, so its first write fails every time."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "diffalign", "configs"], stdout=write_end, stderr=subprocess.PIPE,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=60)
    finally:
        os.close(write_end)
    err = proc.stderr.decode()
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err
