"""What several test modules share: the checkout's paths and commands, tiny models, composed configs, and
reference data. Tests import from here (`from helpers.models import tiny_llama`), never from each other."""
