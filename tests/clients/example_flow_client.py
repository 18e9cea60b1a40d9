"""The flow of ComfyUI's script_examples/websockets_api_example.py, written here (its
code is not ours to copy): queue a prompt over HTTP with a client_id, wait on
/ws?clientId= until the prompt's `executing` with `node: null`, then fetch every image
from /history and /view. The same stdlib urllib and websocket-client package; the
only additions for a fleet are the URL and one header carrying the API key.

Usage: python example_flow_client.py HOST:PORT API_KEY OUT_DIR
Prints a JSON summary of what it saw.
"""

import json
import os
import sys
import urllib.parse
import urllib.request
import uuid

import websocket  # websocket-client, as the example uses

server, api_key, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
client_id = str(uuid.uuid4())
headers = {"X-API-Key": api_key}


def http(path, body=None):
    data = json.dumps(body).encode("utf-8") if body is not None else None
    req = urllib.request.Request(f"http://{server}{path}", data=data, headers=headers)
    with urllib.request.urlopen(req) as resp:
        return resp.read()


prompt = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 24, "batch_size": 1, "color": 255}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "example_flow"}},
}

ws = websocket.WebSocket()
ws.connect(f"ws://{server}/ws?clientId={client_id}", header=[f"X-API-Key: {api_key}"])
prompt_id = json.loads(http("/prompt", {"prompt": prompt, "client_id": client_id}))["prompt_id"]
seen = []
while True:
    out = ws.recv()
    if isinstance(out, str):
        message = json.loads(out)
        seen.append(message["type"])
        data = message.get("data", {})
        if message["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
            break
ws.close()

history = json.loads(http(f"/history/{prompt_id}"))[prompt_id]
saved = []
for node_id, node_output in history["outputs"].items():
    for image in node_output.get("images", []):
        query = urllib.parse.urlencode(
            {"filename": image["filename"], "subfolder": image["subfolder"], "type": image["type"]})
        path = os.path.join(out_dir, image["filename"])
        with open(path, "wb") as f:
            f.write(http(f"/view?{query}"))
        saved.append(path)

print(json.dumps({"prompt_id": prompt_id, "seen": seen, "saved": saved}))
