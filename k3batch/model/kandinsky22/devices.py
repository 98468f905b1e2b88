"""Kandinsky 2.2's components on different devices or dtypes: diffusers' pipelines assume one
device and dtype for all, so each module gets forward hooks that move (and cast) its inputs
to its own device and dtype and its outputs back to the pipeline's device. With one device
and one dtype (the default) no hook is added."""

import torch


def align_devices(prior_pipe, unet, movq, device) -> None:
    """Hooks that move each module's inputs to its device and dtype when the components
    differ in either (diffusers' pipelines assume one device and dtype); `device`: the
    decoder pipeline's."""
    prior = {
        "prior": prior_pipe.prior,
        "text_encoder": prior_pipe.text_encoder,
        "image_encoder": prior_pipe.image_encoder,
    }
    decoder = {"unet": unet, "movq": movq}
    places = {_place(mod) for mod in [*prior.values(), *decoder.values()]}
    if len(places) == 1:
        return
    for modules, home in ((prior, _place(prior_pipe.prior)[0]), (decoder, device)):
        for mod in modules.values():
            _add_align_hooks(mod, home)


def _place(module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def _move(value, device, dtype=None):
    """`value` (tensors, possibly nested in outputs, dicts, lists, tuples) on `device`;
    floating tensors also cast to `dtype` when given."""
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point():
            return value.to(device, dtype)
        return value.to(device)
    if isinstance(value, dict):  # diffusers' BaseOutput and transformers' ModelOutput too
        for k in list(value.keys()):
            value[k] = _move(value[k], device, dtype)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, device, dtype) for v in value)
    return value


def _add_align_hooks(module, home) -> None:
    """Inputs to the module's device and dtype, outputs to `home` (the pipeline's device)."""
    device, dtype = _place(module)

    def before(_, args, kwargs):
        return _move(args, device, dtype), _move(kwargs, device, dtype)

    def after(_, args, kwargs, output):
        return _move(output, home)

    module.register_forward_pre_hook(before, with_kwargs=True)
    module.register_forward_hook(after, with_kwargs=True)
    if hasattr(module, "encode"):
        # The pipelines call MoVQ's encode, not its forward (k3batch decodes it itself).
        encode = module.encode

        def aligned_encode(*args, **kwargs):
            return _move(encode(*_move(args, device, dtype), **_move(kwargs, device, dtype)), home)

        module.encode = aligned_encode
