"""sepit.tune"""
