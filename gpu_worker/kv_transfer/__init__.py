"""Worker-to-worker KV block transport for disaggregated prefill/decode.

A destination worker pulls blocks from a source worker (`KVPuller.pull`, one KVPull in, one
KVPullDone out); the source only answers (`KVPeerServer`). Transports: "zmq" (chunked raw frames,
CPU or GPU, one host or several) and "cuda-ipc" (the source's CUDA cache mapped into the
destination and copied on the device; one host).
"""

from gpu_worker.kv_transfer.puller import CUDA_IPC, ZMQ, KVPuller
from gpu_worker.kv_transfer.server import KVPeerServer

__all__ = ["CUDA_IPC", "ZMQ", "KVPeerServer", "KVPuller"]
