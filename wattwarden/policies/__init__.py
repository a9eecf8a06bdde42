"""policies layer of wattwarden: decisions about power limits, and the hands that make them.

``base`` is the vocabulary (a policy's inputs, its intents, the engine's decisions), ``engine``
composes policies into one decision per GPU, ``manual`` is an operator's request through the API,
and ``actuator`` alone acts on GPUs (journalled, bounded, rate-limited, restorable).
"""
