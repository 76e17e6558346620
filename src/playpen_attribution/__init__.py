"""Training-data attribution for LoRA fine-tunes on playpen transcripts."""
