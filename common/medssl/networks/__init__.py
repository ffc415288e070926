"""medssl.networks"""
