"""Fine-tuning: training data, (Q)LoRA SFT, DPO, and adapter export to GGUF."""
