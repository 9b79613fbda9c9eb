"""Curvature by autograd: loss, gradient, dense Hessian/GGN, products, the mlp closed form."""
