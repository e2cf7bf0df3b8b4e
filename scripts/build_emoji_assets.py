"""Build bctool's embedded emoji dataset from the npm packages' tarballs.

Usage (from the repository root)::

    npm pack emoji-datasource-google emoji-datasource-twitter
    python scripts/build_emoji_assets.py emoji-datasource-google-*.tgz \
        emoji-datasource-twitter-*.tgz --size 32

Each vendor becomes one PNG sprite sheet (tiles in a fixed grid, RGB, alpha composited
on white, downscaled from the 64 px renderings) and ``index.json`` lists the emoji in tile
order. Only base emoji (no skin-tone variants) that both vendors draw are kept.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tarfile
from pathlib import Path

from PIL import Image

VENDORS = ("google", "twitter")
OUT_DIR = Path(__file__).resolve().parents[1] / "bctool" / "data" / "assets" / "emoji"


def _read_member(tar: tarfile.TarFile, name: str) -> bytes:
    member = tar.extractfile(name)
    if member is None:
        raise SystemExit(f"{name} is missing from {tar.name}; is this an emoji-datasource tarball?")
    return member.read()


def _tile(png: bytes, size: int) -> Image.Image:
    """Composite an RGBA rendering on white and downscale it to size x size."""
    rgba = Image.open(io.BytesIO(png)).convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    return rgb.resize((size, size), Image.Resampling.LANCZOS)


def build(tarballs: dict[str, Path], size: int, out_dir: Path) -> None:
    tars = {vendor: tarfile.open(path) for vendor, path in tarballs.items()}
    catalogue = json.loads(_read_member(tars["google"], "package/emoji.json"))
    entries = [
        e for e in catalogue if all(e.get(f"has_img_{vendor}") for vendor in VENDORS)
    ]
    entries.sort(key=lambda e: e["sort_order"])
    columns = math.ceil(math.sqrt(len(entries)))
    rows = math.ceil(len(entries) / columns)
    out_dir.mkdir(parents=True, exist_ok=True)
    for vendor in VENDORS:
        sheet = Image.new("RGB", (columns * size, rows * size), (255, 255, 255))
        for i, entry in enumerate(entries):
            png = _read_member(tars[vendor], f"package/img/{vendor}/64/{entry['image']}")
            sheet.paste(_tile(png, size), ((i % columns) * size, (i // columns) * size))
        sheet.save(out_dir / f"{vendor}.png", optimize=True)
    index = {
        "tile_size": size,
        "columns": columns,
        "vendors": list(VENDORS),
        "source": {v: Path(p).name for v, p in tarballs.items()},
        "emoji": [
            {
                "unified": e["unified"].lower(),
                "short_name": e["short_name"],
                "category": e["category"],
            }
            for e in entries
        ],
    }
    (out_dir / "index.json").write_text(json.dumps(index, indent=0) + "\n")
    print(f"wrote {len(entries)} emoji x {len(VENDORS)} vendors at {size}px to {out_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("google", type=Path, help="emoji-datasource-google-*.tgz")
    parser.add_argument("twitter", type=Path, help="emoji-datasource-twitter-*.tgz")
    parser.add_argument("--size", type=int, default=32, help="tile size in pixels (default 32)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    args = parser.parse_args()
    build({"google": args.google, "twitter": args.twitter}, args.size, args.out)


if __name__ == "__main__":
    main()
