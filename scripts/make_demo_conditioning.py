"""Regenerate the conditioning demo's inputs (committed to the repo): data/conditioning/*.png
and data/conditioning_demo.parquet.

Edge maps of the inpainting demo's scenes (PIL's FIND_EDGES, white edges on black, as HED
hints look) for the Kandinsky 3 ControlNet, and image prompts that refer to those scenes for
the IP-Adapter, plus a plain row: the demo shows each kind of conditioning beside an
unconditioned image. Paths are relative to the repo root, where the demo runs.
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFilter, ImageOps

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "conditioning"
SCENES = ROOT / "data" / "inpaint"

IP_ITEM = pa.struct([("image", pa.string()), ("weight", pa.float64())])


def edges(name: str) -> str:
    image = Image.open(SCENES / f"{name}.png").convert("L")
    edge = ImageOps.autocontrast(image.filter(ImageFilter.FIND_EDGES))
    path = OUT / f"{name}_edges.png"
    edge.point(lambda v: 255 if v > 40 else 0).convert("RGB").save(path)
    return str(path.relative_to(ROOT))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": "plain", "prompt": "a red wooden house on a hill"},
        {
            "id": "hint-house",
            "prompt": "a red wooden house on a hill",
            "hint": edges("house"),
        },
        {
            "id": "hint-tower-half",
            "prompt": "a stone tower at dusk",
            "hint": edges("tower"),
            "controlnet_conditioning_scale": 0.5,
            "control_guidance_end": 0.6,
        },
        {
            "id": "image-prompt-lake",
            "prompt": "a red wooden house on a hill",
            "ip_images": [{"image": "data/inpaint/lake.png", "weight": 1.0}],
        },
        {
            "id": "image-fusion",
            "prompt": "a landscape",
            "ip_images": [
                {"image": "data/inpaint/lake.png", "weight": 0.6},
                {"image": "data/inpaint/field.png", "weight": 0.4},
            ],
            "ip_adapter_scale": 0.8,
        },
    ]
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.string()),
            ("hint", pa.string()),
            ("controlnet_conditioning_scale", pa.float64()),
            ("control_guidance_end", pa.float64()),
            ("ip_images", pa.list_(IP_ITEM)),
            ("ip_adapter_scale", pa.float64()),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, ROOT / "data" / "conditioning_demo.parquet")
    print(f"wrote {len(rows)} rows to data/conditioning_demo.parquet and edge maps to {OUT}")


if __name__ == "__main__":
    main()
