"""Shared code of the pneumonia ViT: image reading, preprocessing, metrics and model loading.

app.py, train_vit.py, evaluate_vit.py and data_prep/ all import from here, so the same image is
read, resized and scored the same way everywhere.
"""
