"""The tiny from-scratch ViT every training test uses, as train_vit.py's --config_overrides string."""

TINY_VIT = "image_size=64,patch_size=16,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"
