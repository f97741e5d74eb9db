"""KServe's side of the tests: its REST client in both protocols (v1 and v2), v2 tensors, and
TorchServe started as KServe's TorchServe runtime starts it (from the KServe storage layout)."""
from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from pathlib import Path

import httpx
import requests
from kserve import InferenceRESTClient, RESTConfig
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse
from prometheus_client.parser import text_string_to_metric_families

from handlers.tools.deploy import layout
from handlers.tools.local.ready import wait_ready
from handlers.tools.local.torchserve import LocalTorchServe, free_port
from handlers.tools.sources import sts_pairs

MODEL = "minilm"
PAIRS = [(a, b) for a, b, _ in sts_pairs()[:5]]
QUERY, CANDIDATES = "A man is playing a guitar.", ["The cat sleeps.", "Someone plays a guitar.", "Stocks fell."]
SHORT = ("A man plays a guitar.", "Someone plays music.")
OPTIONS = {"ij": {"layer": 4, "steps": 4}, "gae": {}, "lrp": {}}


class KServeRuntime(LocalTorchServe):
    """TorchServe started from a KServe storage layout with the runtime's command line:
    ``torchserve --start --model-store=<storage>/model-store --ts-config=<storage>/config/config.properties``."""

    def __init__(self, storage: Path, archives: list[Path]):
        super().__init__(models={MODEL: ""}, model_store=storage / "model-store")
        self.management = self.inference  # the layout serves both APIs on one address
        self.storage = storage
        self.archives = archives

    def free_addresses(self) -> dict[str, str]:
        """Free ports instead of 8085/8082/7070/7071, so that it runs beside other servers."""
        return {
            "inference_address": self.inference,
            "management_address": self.inference,
            "metrics_address": self.metrics,
            "grpc_inference_port": str(free_port()),
            "grpc_management_port": str(free_port()),
            "initial_worker_port": str(random.randrange(20000, 60000, 100)),
        }

    def start(self) -> "KServeRuntime":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        config = layout.build(self.archives, self.storage, mount=str(self.storage), overrides=self.free_addresses())
        command = [
            str(Path(sys.executable).parent / "torchserve"), "--start",
            f"--model-store={self.storage / 'model-store'}", f"--ts-config={config}",
        ]
        subprocess.run(command, env=self.env, cwd=self.workdir, check=True,
                       stdout=open(self.log_dir / "torchserve.out", "w"), stderr=subprocess.STDOUT)
        try:
            wait_ready(self.management, MODEL, self.timeout)
        except Exception:
            self.stop()
            raise TimeoutError(f"TorchServe did not get ready:\n{self.log_tail()}")
        return self


def call(protocol: str, method: str, *args, **kwargs):
    """One call of KServe's REST client (``infer`` or ``explain``)."""
    return asyncio.run(gather(protocol, method, [(args, kwargs)]))[0]


async def gather(protocol: str, method: str, calls: list[tuple[tuple, dict]]) -> list:
    """Several calls at once through one client; exceptions are returned, not raised."""
    client = InferenceRESTClient(RESTConfig(protocol=protocol, timeout=180))
    try:
        return await asyncio.gather(
            *(getattr(client, method)(*args, **kwargs) for args, kwargs in calls), return_exceptions=True
        )
    finally:
        await client.close()


def raised(result) -> httpx.Response:
    assert isinstance(result, httpx.HTTPStatusError), result
    return result.response


def bytes_input(name: str, texts: list) -> InferInput:
    return InferInput(name, [len(texts)], "BYTES", data=texts)


def pair_request(pairs: list[tuple], request_id: str | None = None, parameters: dict | None = None) -> InferRequest:
    inputs = [bytes_input("text_a", [a for a, _ in pairs]), bytes_input("text_b", [b for _, b in pairs])]
    return InferRequest(MODEL, inputs, request_id=request_id, parameters=parameters)


def v2_explain(server, request: InferRequest, path: str = f"v2/models/{MODEL}/explain"):
    """KServe's client has no v2 explain; its infer posts to the explain URL as given."""
    reply = call("v2", "infer", f"{server.inference}/{path}", request, is_graph_endpoint=True)
    return reply if isinstance(reply, Exception) else InferResponse.from_rest(reply)


def output(response: InferResponse, name: str) -> tuple[str, list[int], list]:
    tensor = response.get_output_by_name(name)
    assert tensor is not None, [o.name for o in response.outputs]
    return tensor.datatype, list(tensor.shape), list(tensor.data)


def batch_histogram(server) -> tuple[float, float]:
    """(sum, count) of the handler's requests-per-batch histogram."""
    text = requests.get(f"{server.metrics}/metrics", timeout=10).text
    values = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == "siamese_batch_size":
            for sample in family.samples:
                suffix = sample.name.rsplit("_", 1)[-1]
                if suffix in values:
                    values[suffix] += sample.value
    return values["sum"], values["count"]
