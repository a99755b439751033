"""The adapter kinds: LoRA, DoRA, fully trained parameters, banks. Each one module and one registration."""
