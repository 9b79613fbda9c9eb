"""The native backend: the compiled extension hessian_service._C behind the selector."""
