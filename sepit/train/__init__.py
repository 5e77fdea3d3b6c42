"""sepit.train"""
