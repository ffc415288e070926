"""medssl.methods"""
