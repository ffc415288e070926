"""medssl.engines"""
