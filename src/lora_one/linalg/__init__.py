"""The pure math: tensors in, tensors out. Top-r SVDs and each variant's factors (`spectral`), the
gradient sketch (`sketch`), the dense Riemannian preconditioner (`preconditioner`). These modules import
torch and, of lora-one, `core.errors` alone."""
