"""A Serve application of one small deployment, for the tests of `k3batch serve`'s start-up and
shutdown (which do not depend on the app it runs): it starts in seconds, with no model."""

from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Hello:
    def __call__(self, request) -> str:
        return "hello"


def hello(args: dict) -> serve.Application:
    return Hello.options(**args).bind()
