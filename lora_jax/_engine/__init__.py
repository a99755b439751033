"""The engine (LoRA as a transformation of the traced program) and its front ends: functions, Linen, NNX, attach."""
