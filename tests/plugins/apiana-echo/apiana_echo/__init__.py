"""An apiana_lab backend written only to the design's interface: `invoke(prompt) -> str`, plus `batch_invoke`."""

import os

from apiana_lab.providers import EngineOption, LLMProvider


class EchoProvider(LLMProvider):
    """Answers every prompt with one first-person sentence about its last line; builds nothing heavy."""

    name = "echo"
    loads_weights = True  # so a Ray driver must leave building it to the replicas
    engine_options = (EngineOption("opening", str, "the words each memory starts with (default 'I remember')"),)

    def __init__(self, model: str | None = None, options=None, *, opening: str = "I remember"):
        super().__init__(model or "echo-model", options)
        self.opening = opening
        self.calls = 0
        log = os.environ.get("APIANA_ECHO_BUILT")
        if log:  # where it was built: the test checks that a Ray driver did not build it
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")

    def invoke(self, prompt: str) -> str:
        self.calls += 1
        last = prompt.strip().splitlines()[-1] if prompt.strip() else ""
        return f"{self.opening} that I talked about {' '.join(last.split()[:8])}."

    def batch_invoke(self, prompts: list[str]) -> list[str]:
        return [self.invoke(p) for p in prompts]
