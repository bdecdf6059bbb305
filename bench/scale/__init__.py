"""The scale lab (``python -m bench.scale``): simulated engines at width, NVIDIA Dynamo beside."""
