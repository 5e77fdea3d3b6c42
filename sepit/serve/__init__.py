"""sepit.serve"""
