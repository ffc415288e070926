"""medssl.transforms"""
