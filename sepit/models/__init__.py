"""sepit.models"""
