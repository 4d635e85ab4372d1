"""Turning plane models into volume noise estimates, and combining them (fusion modes)."""
