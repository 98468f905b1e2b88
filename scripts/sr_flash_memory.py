"""Peak activation memory of the Flash x2 parts at full size, without a GPU (docs/superres.md).

Builds the real architectures on the meta device (no weights, no memory) and runs them
under a dispatch mode that counts the bytes of every tensor an op creates until its last
Python reference goes: the peak of live tensors is what the CUDA caching allocator would
have to hold at once, less cuDNN workspaces and fragmentation. Attention is replaced by an
output-sized stand-in, as a memory-efficient SDPA kernel (linear in tokens) behaves on a
GPU; the CPU's math path would materialise tokens x tokens.

    python scripts/sr_flash_memory.py              # SR UNet, MoVQ, Flash UNet figures
    python scripts/sr_flash_memory.py --cpu 256    # check: the same count vs the RSS growth
                                                   # of a real float32 CPU forward (slow)

`--cpu SIDE` runs the full-size SR UNet with random weights on a SIDE x SIDE canvas on one
CPU thread and prints the peak RSS growth beside the counter's peak: run it at two sides and
compare the slopes (a constant of ~0.09 GiB, oneDNN's weight reorders, cancels out).
"""

from __future__ import annotations

import argparse
import resource
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2**30


class LiveTensors(TorchDispatchMode):
    """Bytes of the storages ops create, live until their last tensor is collected."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, list[int]] = {}  # storage -> [tensors alive, bytes]
        self.live = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.storages:
                    self.storages[key] = [0, storage.nbytes()]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self.storages[key][0] += 1
                weakref.finalize(t, self._release, key)
        return out


def peak(fn) -> float:
    """GiB of the most tensors `fn` holds at once (its inputs not counted)."""
    mode = LiveTensors()
    with torch.no_grad(), mode:
        out = fn()
    del out
    return mode.peak / GIB


def linear_attention(q, k, v, **_):
    return torch.empty_like(q)


def sr_unet(dtype=torch.float16, device="meta"):
    from k3batch.model.superres.sr_unet import SR_UNET, SRUNet

    with torch.device("meta"):
        unet = SRUNet(**SR_UNET).to(dtype).eval()
    if device != "meta":
        unet = unet.to_empty(device=device)
        for p in unet.parameters():
            p.data.normal_(0, 0.01)
    return unet


def sr_call(unet, side: int, dtype, device="meta"):
    x = torch.zeros(1, 3, side, side, device=device, dtype=dtype)
    time = torch.full((1,), 979.0, device=device, dtype=dtype)
    return lambda: unet(x, time, x)


def refine_call(flash, n: int):
    half = dict(device="meta", dtype=torch.float16)
    x = torch.zeros(n, 4, 352, 352, **half)
    context = torch.zeros(n, 128, 4096, **half)
    mask = torch.ones(n, 128, device="meta", dtype=torch.long)
    t = torch.full((n,), 229.0, **half)
    return lambda: flash(x, t, encoder_hidden_states=context, encoder_attention_mask=mask)


def figures() -> None:
    from diffusers import Kandinsky3UNet, VQModel

    from k3batch.model.kandinsky3.loading import REFERENCE_MOVQ_CONFIG, REFERENCE_UNET_CONFIG

    unet = sr_unet()
    print("SR UNet, float16, one canvas per call (x2 of the input rounded to 32):")
    for side in (1024, 2048, 4096):
        gib = peak(sr_call(unet, side, torch.float16))
        print(f"  {side}x{side}: {gib:.2f} GiB ({gib / (side * side / 2**20):.4f} GiB/Mpx)")
    F.scaled_dot_product_attention = linear_attention
    with torch.device("meta"):
        movq = VQModel(**REFERENCE_MOVQ_CONFIG).eval()
        flash = Kandinsky3UNet(**REFERENCE_UNET_CONFIG, encoder_hid_dim=4096).half().eval()
    print("MoVQ, float32 (the reference's), one image per call:")
    for side in (1024, 2048, 4096):
        x = torch.zeros(1, 3, side, side, device="meta")
        z = torch.zeros(1, 4, side // 8, side // 8, device="meta")
        enc = peak(lambda x=x: movq.encode(x).latents)
        dec = peak(lambda z=z: movq.decode(z, force_not_quantize=True).sample)
        print(f"  {side}x{side}: encode {enc:.2f} GiB, decode {dec:.2f} GiB")
    print("Flash UNet, float16, refine tiles of 352x352 latents:")
    for n in (1, 4):
        gib = peak(refine_call(flash, n))
        print(f"  {n} tile(s) per call: {gib:.2f} GiB")
    for name, module, size in (("SR UNet", unet, 2), ("MoVQ", movq, 4), ("Flash UNet", flash, 2)):
        count = sum(p.numel() for p in module.parameters())
        print(f"weights: {name} {count / 1e6:.0f}M parameters, {count * size / GIB:.2f} GiB")


def cpu_check(side: int) -> None:
    torch.set_num_threads(1)
    unet = sr_unet(torch.float32, "cpu")
    call = sr_call(unet, side, torch.float32, "cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        call()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / GIB
    counted = peak(call)
    print(f"SR UNet float32 {side}x{side} on CPU: peak RSS +{grown:.3f} GiB, counted {counted:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", type=int, metavar="SIDE", help="check against a CPU run")
    args = parser.parse_args()
    if args.cpu:
        cpu_check(args.cpu)
    else:
        figures()
