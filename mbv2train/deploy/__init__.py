"""Taking a trained model out of mbv2: `mbv2 export` (ONNX, TorchScript, torch.export, ExecuTorch, a
torchvision state dict), each verified in its own runtime, and int8 `mbv2 quantize`.

source.py     a checkpoint (float, or an int8 file from mbv2 quantize) made ready to export: model,
              class names, preprocessing, the images it is checked on
export.py     one writer per format
runtimes.py   the exported file loaded back in its own runtime
verify.py     exported against PyTorch, on real images, with the tolerance that decides success
quantize.py   PT2E post-training int8 quantization, calibration and the float/int8 comparison
"""
