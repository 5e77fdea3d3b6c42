"""sepit.data"""
