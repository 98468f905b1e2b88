"""The Serve application builder: the `Ingress` (`k3batch.serve.ingress`) and the model
deployments (`k3batch.serve.deployments`) bound with their replicas and resources from the
app's config.

`k3batch.serve.app:build_app` is the `import_path` of the Serve configs (configs/serve*.yaml,
cluster/rayservice.yaml) and of `k3batch serve`.
"""

from ray import serve

from k3batch.serve.config import DeploymentConfig, GeneratorDeploymentConfig, ServeAppConfig
from k3batch.serve.deployments import Beautifier, Generator, Upscaler
from k3batch.serve.ingress import Ingress


def replicas(d: DeploymentConfig) -> dict:
    """A model deployment's `.options()`: replicas or autoscaling, queue bounds, resources."""
    return {
        "num_replicas": d.num_replicas,
        "autoscaling_config": d.autoscaling_config,
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        "ray_actor_options": {"num_gpus": d.num_gpus, "num_cpus": d.num_cpus},
    }


def build_app(args: dict) -> serve.Application:
    """Application builder for Serve configs: `import_path: k3batch.serve.app:build_app`."""
    cfg = ServeAppConfig.model_validate(args)
    for model in (cfg.model, cfg.inpaint_model):
        if model is None:
            continue
        model.absolute_paths()  # replicas need not share the driver's working directory
    if cfg.upscale is not None:
        cfg.upscale.absolute_paths()
    dump = cfg.model_dump(mode="json")

    def generator(g: GeneratorDeploymentConfig, name: str, role: str):
        return Generator.options(name=name, **replicas(g)).bind(dump, role)

    inpaint = (
        generator(cfg.inpaint_generator, "InpaintGenerator", "edit")
        if cfg.inpaint_model is not None
        else None
    )
    beautifier = None
    if cfg.beautify is not None:
        b = cfg.beautify
        beautifier = Beautifier.options(
            num_replicas=b.num_replicas,
            max_ongoing_requests=b.max_ongoing_requests,
            ray_actor_options={"num_cpus": b.num_cpus},
        ).bind(dump)
    upscaler = None
    if cfg.upscale is not None:
        upscaler = Upscaler.options(**replicas(cfg.upscaler)).bind(dump)
    return Ingress.options(ray_actor_options={"num_cpus": 0.1}).bind(
        generator(cfg.generator, "Generator", "generate"), dump, inpaint, beautifier, upscaler
    )
