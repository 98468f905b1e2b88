"""Tiles as the KandiSuperRes reference cuts and blends them (Flash x2): offsets every
tile * (1 - overlap), each tile blended linearly with the tile above and to the left, then
cropped; the refine's latent tiles, and the MoVQ's encode and decode in tiles above 1024 px
a side (the reference's `get_movq` with `use_tiling`)."""

import torch

from k3batch.model import movq as movqmod

TILE = 352  # latent tile of the refine
OVERLAP = 0.25
# The reference's MoVQ (`get_movq`): tiles of 1024 px above 1024 px a side, encode without
# overlap, decode with 0.25; 8 px per latent.
MOVQ_TILE = 1024
MOVQ_ENCODE_OVERLAP = 0.0
MOVQ_DECODE_OVERLAP = 0.25
MOVQ_FACTOR = 8


def tile_starts(side: int, tile: int = TILE, overlap: float = OVERLAP) -> list[int]:
    """The reference's tile offsets: every tile * (1 - overlap), tiles past the edge cut."""
    return list(range(0, side, int(tile * (1 - overlap))))


def blend_tiles(tiles: list[list[torch.Tensor]], tile: int = TILE, overlap: float = OVERLAP):
    """The reference's blend: linear ramps over tile * overlap with the (already blended) tile
    above and to the left, each tile then cropped to tile - blend; returns the whole latent."""
    extent = int(tile * overlap)
    keep = tile - extent
    rows = []
    for i, row in enumerate(tiles):
        out = []
        for j, t in enumerate(row):
            if i > 0:
                above = tiles[i - 1][j]
                n = min(above.shape[2], t.shape[2], extent)
                for y in range(n):
                    t[:, :, y] = above[:, :, y - n] * (1 - y / n) + t[:, :, y] * (y / n)
            if j > 0:
                left = row[j - 1]
                n = min(left.shape[3], t.shape[3], extent)
                for x in range(n):
                    t[:, :, :, x] = left[:, :, :, x - n] * (1 - x / n) + t[:, :, :, x] * (x / n)
            out.append(t[:, :, :keep, :keep])
        rows.append(torch.cat(out, dim=3))
    return torch.cat(rows, dim=2)


@torch.no_grad()
def movq_encode(movq, x: torch.Tensor, tile: int = MOVQ_TILE) -> torch.Tensor:
    """The float32 MoVQ latent of one SR image (1, 3, H, W), as the reference's MoVQ: whole
    up to `tile` px a side, else tiles of `tile` px every `tile`, one per call, side by side
    (its blend over 0 latents keeps each tile as it is)."""
    if max(x.shape[-2:]) <= tile:
        return movqmod.encode(movq, x)
    grid = [
        [
            movqmod.encode(movq, x[:, :, a : a + tile, c : c + tile])
            for c in tile_starts(x.shape[3], tile, MOVQ_ENCODE_OVERLAP)
        ]
        for a in tile_starts(x.shape[2], tile, MOVQ_ENCODE_OVERLAP)
    ]
    return blend_tiles(grid, tile // MOVQ_FACTOR, MOVQ_ENCODE_OVERLAP)


@torch.no_grad()
def movq_decode(movq, z: torch.Tensor, tile: int = MOVQ_TILE) -> torch.Tensor:
    """A latent's image (1, 3, 8h, 8w) float32 in [-1, 1]-ish, as the reference's MoVQ:
    whole up to `tile` / 8 latents a side, else latent tiles of `tile` / 8 every 3/4 of
    that, one per call, blended over `tile` / 4 px (`blend_tiles`)."""
    param = next(movq.parameters())
    z = z.to(param.device, param.dtype)
    latent_tile = tile // MOVQ_FACTOR

    def run(latent):
        return movq.decode(latent, force_not_quantize=True).sample

    if max(z.shape[-2:]) <= latent_tile:
        return run(z).float()
    grid = [
        [
            run(z[:, :, a : a + latent_tile, c : c + latent_tile])
            for c in tile_starts(z.shape[3], latent_tile, MOVQ_DECODE_OVERLAP)
        ]
        for a in tile_starts(z.shape[2], latent_tile, MOVQ_DECODE_OVERLAP)
    ]
    return blend_tiles(grid, tile, MOVQ_DECODE_OVERLAP).float()
