"""medssl.weights"""
