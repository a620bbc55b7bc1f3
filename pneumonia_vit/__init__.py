"""The pneumonia ViT's library, in four layers over one image reader:

- images.py, preprocess.py: any accepted file -> 8-bit grey image -> the model's pixels;
- inference/: a trained model as a scorer (the fast int8 path, the fp32 PyTorch model, calibration);
- serving/: what the app and predict.py run: the analysis and its verdict, heatmaps, the page;
- training/: data, the Trainer subclasses, metrics and reports, the model card;
- ood/: the out-of-domain check (the rules run at serving, and the corpus and fitting behind them).
"""
