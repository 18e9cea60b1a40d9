"""Drives a ComfyUI server with comfy-api-simplified (PyPI), used unmodified.

Usage: python comfy_api_simplified_client.py BASE_URL OUT_DIR [API_KEY]
Writes what the library returned into OUT_DIR and prints a JSON summary. With an
API key (comfyfleet), the key goes in as the library's password: the only change
from pointing it at a local ComfyUI.
It must fail loudly if the library is not installed: that is part of the test.
"""

import json
import os
import sys

from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper

base, out_dir = sys.argv[1], sys.argv[2]
api_key = sys.argv[3] if len(sys.argv) > 3 else ""
api = ComfyApiWrapper(base, user="apikey", password=api_key) if api_key else ComfyApiWrapper(base)

# 1. Queue, wait on the WebSocket, then download the outputs over /history + /view.
still = ComfyWorkflowWrapper({
    "1": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 32, "batch_size": 1, "color": 16711680},
          "_meta": {"title": "Empty"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}, "_meta": {"title": "Invert"}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "client_test"},
          "_meta": {"title": "Save Image"}},
})
still.set_node_param("Empty", "color", 255)
saved = api.queue_and_wait_images(still, "Save Image")
saved_paths = []
for name, data in saved.items():
    path = os.path.join(out_dir, "saved_" + os.path.basename(name))
    with open(path, "wb") as f:
        f.write(data)
    saved_paths.append(path)

# 2. A sampler run: the library collects the binary preview frames it streams.
sampler = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
    "3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 6, "cfg": 7.0, "sampler_name": "euler",
          "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0],
          "negative": ["7", 0], "latent_image": ["5", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "client_sampler", "images": ["8", 0]}},
}
import asyncio  # noqa: E402  (the library's coroutine API)

prompt_id, previews = asyncio.run(api.queue_prompt_and_wait(sampler))
preview_paths = []
for i, data in enumerate(previews):
    path = os.path.join(out_dir, f"preview_{i}.jpg")
    with open(path, "wb") as f:
        f.write(data)
    preview_paths.append(path)
history = api.get_history(prompt_id)
out = history[prompt_id]["outputs"]["9"]["images"][0]
final = api.get_image(out["filename"], out["subfolder"], out["type"])
final_path = os.path.join(out_dir, "final.png")
with open(final_path, "wb") as f:
    f.write(final)

print(json.dumps({"saved": saved_paths, "previews": preview_paths, "final": final_path,
                  "status": history[prompt_id]["status"]["status_str"]}))
