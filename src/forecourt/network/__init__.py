"""The ``network`` context: chain, regions, stations, equipment, grades and price lists."""
