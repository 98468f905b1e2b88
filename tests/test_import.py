import subprocess
import sys


def test_import_k3batch_stays_light():
    code = (
        "import sys, k3batch, k3batch.cli, k3batch.config, k3batch.rows;"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'vllm', 'ray') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import k3batch pulled in: {out.stdout.strip()}"
